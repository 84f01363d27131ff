package config

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ContainerMemoryLimit returns the memory limit, in bytes, of the cgroup (v2) the process runs
// in, or 0 if there is none or it cannot be told (cgroup v1, another OS). root is "/" but for
// tests: root/proc/self/cgroup names the cgroup, and root/sys/fs/cgroup/<cgroup>/memory.max
// holds its limit, "max" for none. The limits of the cgroups above it apply too, so the
// smallest along the path is returned. In a container the process's cgroup is usually the
// namespace's root, whose memory.max is the container's limit.
func ContainerMemoryLimit(root string) int64 {
	b, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup"))
	if err != nil {
		return 0
	}
	var group string
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			group = rest
			break
		}
	}
	if group == "" || !strings.HasPrefix(group, "/") {
		return 0
	}
	var limit int64
	for dir := filepath.Clean(group); ; dir = filepath.Dir(dir) {
		if v, err := os.ReadFile(filepath.Join(root, "sys/fs/cgroup", dir, "memory.max")); err == nil {
			if n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64); err == nil && n > 0 && (limit == 0 || n < limit) {
				limit = n
			}
		}
		if dir == "/" {
			return limit
		}
	}
}
