"""The seed notebook's training loops, as the reference thermocal is measured against.

Written as the notebook runs them (its prints included, sent to a null stream), so a comparison
in one process shows what thermocal's loops cost against the seed's own.
"""

import io
from contextlib import redirect_stdout

import torch
import torch.optim as optim


def model(t_u, w, b):
    return w * t_u + b


def loss_fn(t_p, t_c):
    squared_diffs = (t_p - t_c) ** 2
    return squared_diffs.mean()


def dloss_fn(t_p, t_c):
    return 2 * (t_p - t_c) / t_p.size(0)


def grad_fn(t_u, t_c, t_p, w, b):
    dloss_dtp = dloss_fn(t_p, t_c)
    return torch.stack([(dloss_dtp * t_u).sum(), (dloss_dtp * 1.0).sum()])


def hand_gradient(n_epochs, learning_rate, params, t_u, t_c):
    for epoch in range(1, n_epochs + 1):
        w, b = params
        t_p = model(t_u, w, b)
        loss = loss_fn(t_p, t_c)
        grad = grad_fn(t_u, t_c, t_p, w, b)
        params = params - learning_rate * grad
        print("Epoch %d, Loss %f" % (epoch, float(loss)))
    return params


def finite_difference(n_epochs, learning_rate, params, t_u, t_c, delta=0.1):
    # the notebook's one central-difference step on w, then on b, repeated every epoch
    w, b = params
    for epoch in range(1, n_epochs + 1):
        loss_rate_of_change_w = (loss_fn(model(t_u, w + delta, b), t_c) - loss_fn(model(t_u, w - delta, b), t_c)) / (2.0 * delta)
        loss_rate_of_change_b = (loss_fn(model(t_u, w, b + delta), t_c) - loss_fn(model(t_u, w, b - delta), t_c)) / (2.0 * delta)
        w = w - learning_rate * loss_rate_of_change_w
        b = b - learning_rate * loss_rate_of_change_b
        if epoch % 500 == 0:
            print("Epoch %d, Loss %f" % (epoch, float(loss_fn(model(t_u, w, b), t_c))))
    return torch.stack([w, b])


def autograd(n_epochs, learning_rate, params, t_u, t_c):
    for epoch in range(1, n_epochs + 1):
        if params.grad is not None:
            params.grad.zero_()
        t_p = model(t_u, *params)
        loss = loss_fn(t_p, t_c)
        loss.backward()
        with torch.no_grad():
            params -= learning_rate * params.grad
        if epoch % 500 == 0:
            print("Epoch %d, Loss %f" % (epoch, float(loss)))
    return params


def optimizer_sgd(n_epochs, learning_rate, params, t_u, t_c):
    optimizer = optim.SGD([params], lr=learning_rate)
    for epoch in range(1, n_epochs + 1):
        t_p = model(t_u, *params)
        loss = loss_fn(t_p, t_c)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 500 == 0:
            print("Epoch %d, Loss %f" % (epoch, float(loss)))
    return params


SEED_LOOPS = {
    "analytic": lambda t_un, t_c: hand_gradient(5000, 1e-2, torch.tensor([1.0, 0.0]), t_un, t_c),
    "finite-difference": lambda t_un, t_c: finite_difference(5000, 1e-2, torch.tensor([1.0, 0.0]), t_un, t_c),
    "autograd": lambda t_un, t_c: autograd(5000, 1e-2, torch.tensor([1.0, 0.0], requires_grad=True), t_un, t_c),
    "optimizer": lambda t_un, t_c: optimizer_sgd(5000, 1e-2, torch.tensor([1.0, 0.0], requires_grad=True), t_un, t_c),
}


def run_seed_loop(strategy: str, t_un, t_c):
    with redirect_stdout(io.StringIO()):
        return SEED_LOOPS[strategy](t_un, t_c)


def plain_autograd(spec: str, features, t_c, learning_rate: float, n_epochs: int = 5000):
    """The seed's autograd loop written plainly for another model family: the polynomial as
    features @ coefficients, the network as torch.nn's own Sequential (the reference that
    thermocal's generalized loops are measured against)."""
    if spec.startswith("poly"):
        params = [torch.zeros(features.shape[1], requires_grad=True)]
        forward = lambda: features @ params[0]
    else:
        hidden = int(spec.split(":")[1])
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        params = list(net.parameters())
        column = features.reshape(-1, 1)
        forward = lambda: net(column).reshape(-1)
    for epoch in range(1, n_epochs + 1):
        for p in params:
            p.grad = None
        loss = loss_fn(forward(), t_c)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= learning_rate * p.grad
        if epoch % 500 == 0:
            print("Epoch %d, Loss %f" % (epoch, float(loss.detach())))
    return params
