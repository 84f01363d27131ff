package config

import (
	"os"
	"path/filepath"
	"testing"
)

func TestContainerMemoryLimit(t *testing.T) {
	// tree writes files under a new root: path → content.
	tree := func(files map[string]string) string {
		root := t.TempDir()
		for p, content := range files {
			p = filepath.Join(root, p)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return root
	}
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  int64
	}{
		{"container: its namespace's root", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "536870912\n",
		}, 512 << 20},
		{"no limit", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "max\n",
		}, 0},
		{"a service's own limit, under a looser slice's", map[string]string{
			"proc/self/cgroup":                                         "0::/system.slice/tokenproxy.service\n",
			"sys/fs/cgroup/system.slice/memory.max":                    "1073741824\n",
			"sys/fs/cgroup/system.slice/tokenproxy.service/memory.max": "268435456\n",
		}, 256 << 20},
		{"a slice's limit over a service without one", map[string]string{
			"proc/self/cgroup":                                         "0::/system.slice/tokenproxy.service\n",
			"sys/fs/cgroup/system.slice/memory.max":                    "134217728\n",
			"sys/fs/cgroup/system.slice/tokenproxy.service/memory.max": "max\n",
		}, 128 << 20},
		{"cgroup v1: not read", map[string]string{
			"proc/self/cgroup":                           "12:memory:/docker/abc\n1:name=systemd:/docker/abc\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "536870912\n",
		}, 0},
		{"hybrid: the v2 line is used", map[string]string{
			"proc/self/cgroup":             "12:memory:/x\n0::/app\n",
			"sys/fs/cgroup/app/memory.max": "1048576000\n",
		}, 1048576000},
		{"no /proc", map[string]string{}, 0},
		{"garbage", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "lots\n",
		}, 0},
	} {
		if got := ContainerMemoryLimit(tree(tc.files)); got != tc.want {
			t.Errorf("%s: got %d, want %d", tc.name, got, tc.want)
		}
	}
}
