# `make test` and `make demo` are the README's two commands.
.PHONY: test demo
test:
	./run test
demo:
	./run demo
