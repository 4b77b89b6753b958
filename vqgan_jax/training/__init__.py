"""Training: the shared loop, optimisers, and one trainer per stage (`stage1`, `stage2`).

Only entry points (train_stage1.py, train_stage2.py, demo, bench, dry_run,
convert_taming) import from here; inference modules never do.
"""
