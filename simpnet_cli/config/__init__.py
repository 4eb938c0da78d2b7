"""What a run is: the C_x{y} notation, the schemas, the paper's tables and their variants."""
