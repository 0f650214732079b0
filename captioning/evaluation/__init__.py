"""Scores and reports: BLEU two ways, diagnostics, COCO metrics, the HTML gallery."""
