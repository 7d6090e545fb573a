"""The proxy's configuration: model (the settings objects) and load (the YAML file's sections parsed
into them). The generic validating reader under both is proxy.yamlreader; role policy files are
read by proxy.policy.files."""
