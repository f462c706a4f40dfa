"""Speculative (assisted) decoding: cheap proposers guess the next tokens, the target model checks
them all in one forward pass, and greedy output stays exactly what plain decoding gives."""
