"""The `genembed` command line (cli.main) and the supervisor of `genembed serve` (cli.supervisor): they start
the gateway and the workers, so they sit above both packages."""
