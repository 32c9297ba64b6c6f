"""Stream plumbing: the Faust app, topics, codecs, the stage runner and declarations."""
