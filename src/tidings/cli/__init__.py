"""The `tidings` command line; the entry point is `tidings.cli.main:main`.

`main` holds the root app and turns library errors into one-line messages; `store`,
`projections` and `demo` hold the commands; `render` builds what they print.
"""
