"""The in-process annotation flow (records, instruction composition, parsing, annotate())."""
