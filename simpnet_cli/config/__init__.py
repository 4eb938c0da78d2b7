"""What a run is: the schemas, the paper's tables and their variants, composed into one RunSpec per run."""
