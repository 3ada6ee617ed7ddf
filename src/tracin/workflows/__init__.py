"""The workflows built on the library: the command line, the image / ranking / knowledge-graph jobs,
the demo, audits, quality evaluations, and the analysis and HTML report of a results directory.
Nothing in the library imports this package."""
