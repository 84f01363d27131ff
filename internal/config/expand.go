package config

import (
	"errors"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

// expandNode replaces ${VAR} and ${VAR:-default} in every scalar value below n (keys are left
// alone). Expanding the parsed tree rather than the raw text means a secret containing YAML
// syntax (`#`, `: `, quotes) can never change the document's structure. "$${" stands for a
// literal "${"; any other "$" is kept as written.
func expandNode(n *yaml.Node, path string, getenv Getenv) []error {
	var errs []error
	switch n.Kind {
	case yaml.DocumentNode, yaml.SequenceNode:
		for i, c := range n.Content {
			p := path
			if n.Kind == yaml.SequenceNode {
				p = fmt.Sprintf("%s[%d]", path, i)
			}
			errs = append(errs, expandNode(c, p, getenv)...)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			errs = append(errs, expandNode(n.Content[i+1], join(path, n.Content[i].Value), getenv)...)
		}
	case yaml.ScalarNode:
		if !strings.Contains(n.Value, "${") {
			return nil
		}
		v, err := expand(n.Value, getenv)
		if err != nil {
			return []error{fmt.Errorf("%s: %w (line %d)", path, err, n.Line)}
		}
		n.Value = v
		// Let a plain scalar take the type of its expansion (`port: ${PORT}` is an int),
		// except null: an expansion never turns a value into nothing.
		if n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) == 0 {
			n.Tag = ""
			switch v {
			case "", "~", "null", "Null", "NULL":
				n.Tag = "!!str"
			}
		}
	}
	return errs
}

// expand substitutes the variables in s.
func expand(s string, getenv Getenv) (string, error) {
	var b strings.Builder
	var errs []error
	for {
		i := strings.Index(s, "${")
		if i < 0 {
			b.WriteString(s)
			break
		}
		if i > 0 && s[i-1] == '$' { // "$${" is a literal "${"
			b.WriteString(s[:i])
			b.WriteString("{")
			s = s[i+2:]
			continue
		}
		b.WriteString(s[:i])
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			errs = append(errs, errors.New("unterminated ${ reference"))
			break
		}
		ref := s[i+2 : i+end]
		s = s[i+end+1:]
		name, def, hasDef := strings.Cut(ref, ":-")
		if !validEnvName(name) {
			// The reference is not echoed: it may be a secret pasted where a name belongs.
			errs = append(errs, errors.New("invalid variable reference: want ${NAME} or ${NAME:-default}"))
			continue
		}
		v := getenv(name)
		switch {
		case v != "":
			b.WriteString(v)
		case hasDef:
			b.WriteString(def)
		default:
			errs = append(errs, fmt.Errorf("environment variable %s is not set", name))
		}
	}
	return b.String(), errors.Join(errs...)
}

func validEnvName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r == '_', r >= 'A' && r <= 'Z', r >= 'a' && r <= 'z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
