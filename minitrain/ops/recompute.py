"""Activation recomputation (gradient checkpointing): a block of the forward whose activations
are not kept for the backward, but made again there from the block's input.

    forward      y = f(x; θ)    run with the graph recorded, as without recomputation; keep x
                                (and the dropout generator's state) and let the graph go
    backward     x' = a leaf holding x's data; y' = f(x'; θ) again: the same operations on the
                 same values in the same order, so the same bits as y (dropout draws the same
                 masks: its generator is put back where it was, and afterwards where it is)
                 y'.backward(dy): θ's gradients accumulate into θ.grad as in any backward, and
                 x'.grad is dx, returned

Every gradient is then the one the whole graph gives: θ's come from the same operations on the
same arrays, and dx from the same contributions inside the block (x's other uses outside add
theirs to it, as before: a sum of two terms, in either order the same bits).

Memory: between its forward and its backward the block holds x and y only; its own activations
live while its forward or backward runs (one block at a time).
"""

from minitrain.autograd import Function, Tensor, grad_enabled


class Recompute(Function):
    """y = block(x), differentiated by running block again. Inputs: x and the tensors θ the block
    trains (so that the graph reaches it when only θ needs a gradient); their gradients land in
    θ.grad from the inner backward, and None is returned for them."""

    def backward(self, g):
        x = self.inputs[0]
        leaf = Tensor(x.data, requires_grad=x.requires_grad)
        now = self.rng and self.rng.bit_generator.state
        if self.rng:
            self.rng.bit_generator.state = self.rng_state
        y = self.block(leaf)
        if self.rng:
            self.rng.bit_generator.state = now
        y.backward(g)
        return (leaf.grad,) + (None,) * (len(self.inputs) - 1)


def recompute(block, x, trained, rng=None):
    """block(x) -> Tensor, with its activations recomputed in the backward. `trained`: the
    tensors the block reads that may need a gradient; `rng`: a numpy Generator the block draws
    dropout masks from, or None. Without a graph being recorded (evaluation) it is block(x)."""
    needs = (x.requires_grad, *(t.requires_grad for t in trained))
    if not grad_enabled() or not any(needs):
        return block(x)
    fn = Recompute()
    fn.block, fn.rng, fn.needs_grad = block, rng, needs
    fn.rng_state = rng and rng.bit_generator.state
    y = block(Tensor(x.data, requires_grad=x.requires_grad))  # its graph is dropped on return
    fn.inputs = (x, *trained)
    return Tensor(y.data, requires_grad=True, ctx=fn)
