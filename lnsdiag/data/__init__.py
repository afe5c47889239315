"""Text sources and the token windows cut from them."""
