"""`validator bench`: research benchmark suites against hosts, and their reports.

- suite.py: the suite YAML (pydantic), prompt sets, settings grids, probe expansion, the plan;
- files.py: append-only JSONL logs and atomic rewrites;
- runner.py: sends the probes through validator.probing.client, records each result durably as
  it arrives (resumable), scores them through the service's scorer;
- report.py: report.json, report.md and a self-contained report.html;
- compare.py: what changed between two report.json files.
"""
