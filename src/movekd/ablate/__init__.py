"""The paper's ablations (Tables 2-5, §5.1) as config deltas, run at equal steps over seeds."""

from movekd.ablate.ladder import DEFAULT_ROWS, ROWS, row_config
from movekd.ablate.run import format_markdown, run_ablation, summarise

__all__ = ["DEFAULT_ROWS", "ROWS", "format_markdown", "row_config", "run_ablation", "summarise"]
