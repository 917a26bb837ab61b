"""The step math: the sampler and its schedules, views, masks, prompt parsing (docs/method.md)."""
