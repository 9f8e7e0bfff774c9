"""Batch offline sampling (`lstmgen sample`): a tool over the serving engine and scheduler, no server.

prompts.py reads and checks the input as a stream; jobs.py makes one job per (prompt, sample)
with its seed; runner.py drives the scheduler with a bounded window; outputs.py and resume.py
append durably and continue a killed run exactly; lock.py keeps one writer per output;
progress.py reports; ray_data.py runs the same job on Ray Data; cli.py is the command. Nothing
here imports torch.
"""
