"""Side-by-side measurements: each module runs a baseline in the same run and reports ratios."""
