"""Analysis of influence results: health score, mispredictions, mislabels, figures, HTML report."""
