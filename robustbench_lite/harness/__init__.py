"""Running grids of cells: specs, plans and presets, the cell-kind registry, the executors and the
results store.
"""
