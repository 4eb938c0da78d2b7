"""Running many: planning and executing runs, their records, and the progress display."""
