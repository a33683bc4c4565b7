"""What happens to the spans themselves on their way to MLflow: which traces pass,
whole (``selection``, a span processor in the pipeline), the copy MLflow gets
(``enrich``, per batch, as delivery encodes it) and what is hidden in it (``redact``).
Nothing here sends or stores anything: ``delivery`` does."""
