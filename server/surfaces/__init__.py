"""API surfaces: each module translates one API onto the shared run path (`server.text_generation`) and frames its
answers in that API's shapes. None of them touches the engine's internals or llama.cpp."""
