"""The subcommands of `tasprune`, one module each: `add(subparsers)` declares a command's
arguments (its --help says what it writes where), and the function it sets as `func`
does the work by calling the library. The parser and the error handling are
`tasprune.cli`."""
