console.log("python setup placeholder")
