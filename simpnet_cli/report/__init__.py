"""The report: claims, the data it shows, its markdown/LaTeX text, its figures, and the files it writes."""
