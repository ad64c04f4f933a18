"""Stage 3: one answer's verdict against the reference model. tokens.py (byte-level token
table), reference.py (the reference model: teacher-forced features, generation),
align.py (the answer's token path, recovered from its text), verdict.py (the statistics
and the verdict), batch.py (the batch scorer every front door uses), similarity.py
(answer against the reference's own answer: reported, never decisive)."""
