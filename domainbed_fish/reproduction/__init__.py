"""Reproduce the paper's own experiments on a CPU, through DomainBed's train script.

    python -m domainbed_fish.reproduction --output_dir reproduction [--preset quick|default|long]

runs the linear toy (ERM, Fish, IDGM) and CdSprites-N for several N (ERM, CORAL,
Fish, IDGM, several seeds) as DomainBed jobs, then writes ``report.md`` with the
tables, ``figure4_accuracy_vs_n.png``, ``figure5_gip_n15.png`` and
``report.json``.  Jobs that finished are kept, so a killed run is finished by
running the same command again.

Modules: :mod:`.presets` (what is run), :mod:`.jobs` (running DomainBed's
train script), :mod:`.gip_trace` (the gradient inner product over training,
measured from checkpoints), :mod:`.report` (tables and figures).
"""
