"""Reports over trained runs: the comparison of architectures (``compare``), robustness under attack
(``robustness``) and layer visualizations (``visualize``). Import the submodule you need: each pulls in
torch or matplotlib only when it runs."""
