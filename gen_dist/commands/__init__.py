"""The code of each `gen-dist` command, one module per group of commands; `gen_dist.cli` parses and dispatches."""
