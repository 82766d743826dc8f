"""The run report: one self-contained HTML page with learning curves, confusion, mistakes and the plan.

Bottom-up: ``run`` reads a run folder, ``figures`` draws, ``markup`` holds the HTML helpers,
``sections`` is the registry of the page's sections, ``write`` puts the page together.
"""

from headstart.report.figures import (
           confusion_figure,
           confusion_heatmap_png,
           examples_figure,
           figure_png,
           learning_curves_figure,
           thumbnail,
)
from headstart.report.run import read_run, stage_plans
from headstart.report.sections import SECTIONS
from headstart.report.write import FIGURES, write_report

__all__ = ["FIGURES", "SECTIONS", "confusion_figure", "confusion_heatmap_png", "examples_figure", "figure_png",
           "learning_curves_figure", "read_run", "stage_plans", "thumbnail", "write_report"]
