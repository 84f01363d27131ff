package proxy

import (
	"net/http"
	"strings"
)

// maxPathLen bounds request paths; Azure's longest data-plane paths are well under this.
const maxPathLen = 1024

// checkPath accepts only canonical paths made of letters, digits and '/', '-', '_', '.', with no
// empty, '.' or '..' segments. The gateway authorises a deployment named in the path and then
// forwards the path; anything an upstream might normalise differently (dot segments, doubled or
// encoded slashes, backslashes) could make it reach a deployment the caller was not allowed, so
// such paths are refused rather than cleaned. No Azure OpenAI or Foundry route needs them.
func checkPath(escaped string) *apiError {
	if len(escaped) > maxPathLen {
		return errorf(http.StatusRequestURITooLong, CodeInvalidPath, "the request path is longer than %d bytes", maxPathLen)
	}
	if escaped == "" || escaped[0] != '/' {
		return errorf(http.StatusBadRequest, CodeInvalidPath, "the request path must start with /")
	}
	for i := 0; i < len(escaped); i++ {
		if !pathByte(escaped[i]) {
			return errorf(http.StatusBadRequest, CodeInvalidPath,
				"the request path may contain only letters, digits and / - _ . (no percent-encoding)")
		}
	}
	if escaped == "/" {
		return nil
	}
	for seg := range strings.SplitSeq(escaped[1:], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return errorf(http.StatusBadRequest, CodeInvalidPath,
				"the request path must not contain empty, '.' or '..' segments")
		}
	}
	return nil
}

// pathByte reports whether a path checkPath accepts may hold c.
func pathByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '/' || c == '-' || c == '_' || c == '.'
}

// refusedPath is what the log keeps of a path checkPath refused: its whole segments before the
// first byte it refused, or before maxPathLen, and "…" for the rest. No segment is cut, so none of
// a key is logged that the path's key check (keyInPath) and the credential's scrub do not see
// whole; what made the path wrong is in the error's message.
func refusedPath(path string) string {
	end := min(len(path), maxPathLen)
	for i := range end {
		if !pathByte(path[i]) {
			end = i
			break
		}
	}
	if end == len(path) {
		return path // refused for its segments ("", ".", ".."), which are whole
	}
	return path[:strings.LastIndexByte(path[:end], '/')+1] + "…"
}
