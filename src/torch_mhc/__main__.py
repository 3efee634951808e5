from torch_mhc.cli import run

run()
