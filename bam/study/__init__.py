"""The staged study behind `bam run` and `bam demo`: settings, the stage cache, the experiment,
the paper-claim checks and the report."""
