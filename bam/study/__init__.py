"""The staged study behind `bam run` and `bam demo`. Its files, each importing only those above it:

    settings.py  PIPELINE.yaml's schema and the demo's presets
    stages.py    the stage cache (OUT/stages) and the log
    results.py   what the study measures, filed by model (ModelKey) and seed
    report.py    report.md, report.json and plots; the models' display labels
    claims.py    statistics over seeds, and the paper's claims checked per seed
    study.py     the stages and the experiment: data, seed, experts, mixtures, the add-expert experiment
"""
