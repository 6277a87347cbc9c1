"""The embedded demos: the 2-D toy, the 1-D Figure-2 demo and the digits image demo."""
