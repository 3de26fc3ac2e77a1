"""The storage seam: every read and write the pipeline makes (composed by the lead)."""
