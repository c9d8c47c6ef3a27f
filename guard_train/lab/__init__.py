"""The memorization lab: a research testbed built on the core, never imported by it.

The procedural dataset with planted duplicates (`dataset`, `photos`), the embedded tiny SD and its codec
(`tiny_sd`, `codec`, `pretrain`), the attribute scorer for lab alignment (`aligner`), copy-metric calibration
(`calibration`), the end-of-run summary (`summary`), the lab benchmark (`bench`), the CLI's config schema that
adds `data.source=lab` (`config`) and the lab's `guard-train` subcommands (`cli`). The CLI is the only core-side
module that imports it.
"""
