"""The run spec: ``model`` (the pydantic ``RunSpec``), ``loader`` (YAML to a spec, with errors that
name the file, line and field) and ``secrets_scan`` (values that look like keys are refused)."""
