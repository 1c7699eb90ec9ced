"""One attempt at delivering a send, the verdict each reply gets, and the rq job functions."""
