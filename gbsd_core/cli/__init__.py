"""The command-line wing: `gbsd` and its sub-commands, the PNG metadata they write, the weights registry.

main.py dispatches; common.py holds what every command shares (the usage-error contract, argument groups, input
checks, the model resolver). It is the only wing that may import the other wings (fast/ for --fast, bokeh/ for
eval, grid, rack and --trace); the core imports none of it.
"""
