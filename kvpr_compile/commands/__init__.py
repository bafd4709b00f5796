"""Sub-commands of the `kvpr` CLI; each module defines `add_parser(subparsers)`."""
