"""The service layer: the read-stage-write operations every front door calls
(operations.py, reads.py), the models one process scores with (scorer.py), `validator
audit` (audit.py), what produced a verdict (provenance.py), calibration and the config."""
