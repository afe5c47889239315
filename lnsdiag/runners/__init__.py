"""One runner per command: a config in, a result out that writes its own files."""
