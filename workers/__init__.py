"""One module per stage: a plain `handle_*` coroutine plus a thin Faust agent (`register`)."""
