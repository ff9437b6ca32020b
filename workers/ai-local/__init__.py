"""Package data: the Worker entrypoint that serves env.AI under `wrangler dev` (`workers-ai-local worker` prints its folder)."""
