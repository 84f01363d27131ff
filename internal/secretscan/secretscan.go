// Package secretscan finds secrets in text, for tests asserting that none escape into logs,
// metrics or answers.
package secretscan

import "strings"

// PrefixLen is how many leading characters of a secret count as the secret: enough that a
// truncated key or token in a log is still caught, few enough not to collide by chance.
const PrefixLen = 12

// Find returns the index in text of the first secret found, whole or as its first PrefixLen
// characters, and which one it was; -1 if there is none.
func Find(text string, secrets []string) (at, which int) {
	for i, s := range secrets {
		if s == "" {
			continue
		}
		if len(s) > PrefixLen {
			s = s[:PrefixLen]
		}
		if j := strings.Index(text, s); j >= 0 {
			return j, i
		}
	}
	return -1, -1
}
