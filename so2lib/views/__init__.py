"""What a person looks at: the HTML report, the terminal summary, plotly renderers, the neuron explorer."""
