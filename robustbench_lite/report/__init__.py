"""Reading the store: leaderboard CSVs and the HTML/markdown report.
"""
