"""The step loop run on a model: prepared inputs, the pipeline, the stream, memory estimates."""
