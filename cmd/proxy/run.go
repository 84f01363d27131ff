package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

var (
	// errUsage means the command line was wrong; usage has been printed.
	errUsage = errors.New("usage")
	// errReported means the problem has already been printed in full.
	errReported = errors.New("reported")
)

const usage = `proxy: a keyless gateway to Azure OpenAI and Azure AI Foundry.

Callers present a gateway key (api-key or Authorization: Bearer); the gateway presents
an Entra ID token it holds for the upstream. Nobody calling it holds an Azure secret.

Usage:
  proxy serve --config FILE      run the gateway (FILE may also come from $PROXY_CONFIG)
  proxy demo                     run the gateway against a built-in Entra + Azure OpenAI emulator
  proxy emulator                 run only the emulator, printing the environment to use it
  proxy validate --config FILE   check a configuration and print every problem
  proxy hash-key [--generate]    print the key_sha256 of a caller key read on stdin
  proxy version                  print the version

Run "proxy COMMAND --help" for a command's options.
`

// run is the whole program; main only traps signals and turns the error into an exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		err = runServe(ctx, rest, getenv, stdout, stderr)
	case "demo":
		err = runDemo(ctx, rest, stdout, stderr)
	case "emulator":
		err = runEmulator(ctx, rest, stdout, stderr)
	case "validate":
		err = runValidate(rest, getenv, stdout, stderr)
	case "hash-key":
		err = runHashKey(rest, stdin, stdout, stderr)
	case "version":
		if err = parseFlags(newFlagSet("version", "", "Print the version.", stderr), rest, stdout); err == nil {
			fmt.Fprintln(stdout, versionString())
		}
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "proxy: unknown command %q\n\n%s", cmd, usage)
		err = errUsage
	}
	if errors.Is(err, errHelpShown) {
		return nil
	}
	return err
}

func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v = bi.Main.Version
	}
	return fmt.Sprintf("proxy %s (%s %s/%s)", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// newFlagSet makes a command's flag set whose -h/--help prints its synopsis and options.
func newFlagSet(name, args, summary string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage: proxy %s %s\n\n%s\n", name, args, summary)
		var hasFlags bool
		fs.VisitAll(func(*flag.Flag) { hasFlags = true })
		if hasFlags {
			fmt.Fprintln(out, "\nOptions:")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parseFlags parses args; --help prints usage to stdout and counts as success (errHelpShown).
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			fs.SetOutput(stdout)
			fs.Usage()
			return errHelpShown
		}
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "proxy %s: unexpected argument %q\n", fs.Name(), strings.Join(fs.Args(), " "))
		return errUsage
	}
	return nil
}

// errHelpShown ends a command successfully after its help was printed.
var errHelpShown = errors.New("help shown")
